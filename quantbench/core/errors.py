"""User-facing errors: the CLI prints these as one line, without a traceback."""


class QuantbenchError(Exception):
    """A mistake in the user's input or environment (bad config, missing file, offline hub...)."""


class ConfigError(QuantbenchError):
    """The run config is invalid; the message names the offending key."""


class AssetError(QuantbenchError):
    """An offline asset could not be fetched, verified or converted."""


class UnsupportedArchitecture(QuantbenchError):
    """The tracer (quantbench.modeling.arch.topology) cannot map the model's architecture; the message says what it did not find."""
