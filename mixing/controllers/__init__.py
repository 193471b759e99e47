"""Controllers, one module each, with one interface: ``observe(...)``, ``step()``, ``weights``, ``state_dict()``."""

from mixing.controllers.base import Controller
from mixing.controllers.dga import DGAController, gradient_alignment
from mixing.controllers.doremi import DoReMiController
from mixing.controllers.odm import ODMController
from mixing.controllers.scheduled import ScheduledController
from mixing.controllers.static import StaticController

CONTROLLERS: dict[str, type[Controller]] = {
    cls.name: cls for cls in (StaticController, ScheduledController, DoReMiController, ODMController, DGAController)
}

__all__ = [
    "CONTROLLERS",
    "Controller",
    "DGAController",
    "DoReMiController",
    "ODMController",
    "ScheduledController",
    "StaticController",
    "gradient_alignment",
]
