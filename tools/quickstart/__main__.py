import runpy

runpy.run_module("boneage_tpu.quickstart", run_name="__main__", alter_sys=True)
