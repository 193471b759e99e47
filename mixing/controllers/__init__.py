"""Controllers, one module each, with one interface: ``observe(...)``, ``step()``, ``weights``, ``state_dict()``."""

from onlinemix.mixing.controllers.ado import ADOController
from onlinemix.mixing.controllers.bandit import ClusterBanditController, neighbour_similarity
from onlinemix.mixing.controllers.base import Controller
from onlinemix.mixing.controllers.dga import DGAController, gradient_alignment
from onlinemix.mixing.controllers.doremi import DoReMiController
from onlinemix.mixing.controllers.odm import ODMController
from onlinemix.mixing.controllers.scheduled import ScheduledController
from onlinemix.mixing.controllers.static import StaticController

CONTROLLERS: dict[str, type[Controller]] = {
    cls.name: cls
    for cls in (
        StaticController,
        ScheduledController,
        DoReMiController,
        ODMController,
        DGAController,
        ADOController,
        ClusterBanditController,
    )
}

__all__ = [
    "CONTROLLERS",
    "ADOController",
    "ClusterBanditController",
    "Controller",
    "DGAController",
    "DoReMiController",
    "ODMController",
    "ScheduledController",
    "StaticController",
    "gradient_alignment",
    "neighbour_similarity",
]
