"""`Generic` for classes on a command's start-up path, without importing `typing` at run time.

Importing typing costs about a tenth of a short command's start-up on a small VM. Type checkers
see typing's own `Generic`; at run time `Generic[...]` is plain `object`, so a class deriving
from it is an ordinary class (its type parameters matter to the checker only). A module using
it defines its TypeVars under TYPE_CHECKING and binds the same names to None otherwise.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Generic as Generic
else:
    class Generic:
        """Stands in for typing.Generic at run time: subscripting it gives `object`."""

        def __class_getitem__(cls, params: object) -> type:
            return object

__all__ = ["Generic"]
