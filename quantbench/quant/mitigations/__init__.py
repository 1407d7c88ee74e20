"""Outlier mitigations: one module each, one small interface (quantbench.quant.plugin.Mitigation).

Each public module here defines a Mitigation subclass with typed Options and registers it with
`@MITIGATIONS.register("<name>")` (quantbench.quant.spec.MITIGATIONS); the registry imports every
public module of this package the first time a mitigation is looked up. Modules whose name starts
with "_" are helpers.
"""
