"""The tests run the kernels on the JIT backend in this process and in the
processes they start, whatever AOT build the machine has; tests/test_aot.py
sets up its own build and environment for the AOT backend. Schedules the
search finds are cached in a folder of this run's own (qnrt.plan_cache), not
the user's."""
import os
import tempfile

os.environ["QNRT_JIT"] = "1"
os.environ["QNRT_PLAN_DIR"] = tempfile.mkdtemp(prefix="qnrt-plans-")
