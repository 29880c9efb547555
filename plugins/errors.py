"""Errors users can act on. The CLI prints their message as one line and exits non-zero."""


class QuantmillError(Exception):
    """A problem with the user's input or environment, described in one clear sentence."""


class PluginError(QuantmillError):
    """A plugin is missing, misnamed, or registered twice."""


class ConfigError(QuantmillError):
    """A recipe or plugin setting is invalid."""
