"""The benchmark cases, one module each; every module has ``run(env) -> CaseResult``."""
