"""The tests run the kernels on the JIT backend in this process and in the
processes they start, whatever AOT build the machine has; tests/test_aot.py
sets up its own build and environment for the AOT backend."""
import os

os.environ["QNRT_JIT"] = "1"
