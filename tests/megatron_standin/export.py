from standin_utils import record

record("export")
