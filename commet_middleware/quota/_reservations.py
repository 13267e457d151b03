"""Units held by requests in flight, between a quota check and its commit or release."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

from commet_middleware._keys import new_request_id

from ._decide import Number

__all__ = ["InMemoryReservationStore", "Reservation", "ReservationStore"]

_Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Reservation:
    """``count`` units of a customer's feature held by one request until commit or release."""

    customer_id: str
    feature: str
    count: int
    # Unique across processes (a store may be shared) without uuid4's system call.
    id: str = field(default_factory=new_request_id)
    # False when the quota store could not be reached and the policy let the request through
    # anyway: nothing is held anywhere, but the commit still bills the units.
    stored: bool = True


class ReservationStore(Protocol):
    """Where one process's in-flight reservations live (the memory quota store's part).

    Every method is atomic. Stores shared by several processes hold reservations themselves,
    with a lease (see ``QuotaStore``)."""

    def reserve(
        self, customer_id: str, feature: str, count: int, limit: Number | None
    ) -> Reservation | None:
        """Hold ``count`` units if ``in_flight + count <= limit`` (None: no limit), else None."""
        ...

    def release(self, reservation: Reservation) -> bool:
        """Give the units back; False if the reservation was already settled."""
        ...

    def commit(self, reservation: Reservation) -> bool:
        """Settle the reservation as used; False if it was already settled."""
        ...

    def in_flight(self, customer_id: str, feature: str) -> int:
        """Return the units currently held for the customer's feature."""
        ...


class InMemoryReservationStore:
    """A :class:`ReservationStore` for one process, guarded by a ``threading.Lock``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[_Key, int] = {}
        self._open: dict[str, Reservation] = {}

    def reserve(
        self, customer_id: str, feature: str, count: int, limit: Number | None
    ) -> Reservation | None:
        """Hold ``count`` units if ``in_flight + count <= limit`` (None: no limit), else None."""
        key = (customer_id, feature)
        with self._lock:
            held = self._held.get(key, 0)
            if limit is not None and held + count > limit:
                return None
            reservation = Reservation(customer_id, feature, count)
            self._held[key] = held + count
            self._open[reservation.id] = reservation
            return reservation

    def _settle(self, reservation: Reservation) -> bool:
        with self._lock:
            if self._open.pop(reservation.id, None) is None:
                return False
            key = (reservation.customer_id, reservation.feature)
            left = self._held.get(key, 0) - reservation.count
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)
            return True

    def release(self, reservation: Reservation) -> bool:
        """Give the units back; False if the reservation was already settled."""
        return self._settle(reservation)

    def commit(self, reservation: Reservation) -> bool:
        """Settle the reservation as used; False if it was already settled."""
        return self._settle(reservation)

    def in_flight(self, customer_id: str, feature: str) -> int:
        """Return the units currently held for the customer's feature."""
        with self._lock:
            return self._held.get((customer_id, feature), 0)
