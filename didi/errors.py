"""One exception type for every problem a user can fix by changing their input."""


class DidiError(Exception):
    """Bad input or an unreachable request; the message names the file, tensor or option at fault."""
