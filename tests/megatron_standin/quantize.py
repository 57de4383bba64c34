from standin_utils import record

record("quantize")
