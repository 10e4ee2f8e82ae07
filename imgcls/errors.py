"""Errors a user can cause and fix: the CLI turns them into exit code 2 and one paragraph, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, paths, data) rather than a bug in imgcls."""


class ConfigError(UserError):
    """The configuration file or a `--set` override is invalid."""


class DataError(UserError):
    """The data set is missing, empty or unusable."""


class ResourcePlanError(UserError):
    """The requested workers and CPUs cannot run on this Ray cluster."""
