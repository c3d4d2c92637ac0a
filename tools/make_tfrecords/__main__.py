import runpy

runpy.run_module("boneage_tpu.convert", run_name="__main__", alter_sys=True)
