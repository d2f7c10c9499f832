"""Config errors, shared by the model config, the routing options and the experiment configs."""


class ConfigError(ValueError):
    """A config field is unknown or has a value jaxdyn does not support."""


class ConfigKeyError(ConfigError, KeyError):
    """A config or an override names a key that is not known (or lacks one)."""

    def __str__(self):
        return str(self.args[0])


class ConfigValueError(ConfigError):
    """A config value is of the wrong type or out of range."""
