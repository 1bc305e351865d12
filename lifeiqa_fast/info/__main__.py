"""python -m lifeiqa_fast.info: print what was built and what impl="auto" picks."""
from . import format_info, info

print(format_info(info()))
