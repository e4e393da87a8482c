"""A plugin that fails at import, as one with a missing dependency would."""

import erofs_mount_no_such_dependency  # noqa: F401
