"""User-facing errors: one clear sentence naming the key, file or line at fault."""


class UserError(ValueError):
    """An error the user can fix (bad config, file or argument). The CLI prints it and exits 2."""


class ConfigError(UserError):
    """A configuration key has a bad value or type."""


class CheckpointError(UserError):
    """A model folder is missing a component or breaks an invariant of the layout."""


class TrainingError(RuntimeError):
    """A run cannot go on although its inputs were fine (e.g. repeated non-finite updates)."""
