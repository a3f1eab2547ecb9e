"""Weight faults: fault models, dnn-benchmarks fault lists, the fast runner and its reports.

``faults`` (sites, fault models, ``apply_weight_faults``, ``random_weight_faults``), ``fault_list``
(read / validate / write / generate), ``runner`` (golden pass and per-fault outcomes), ``replay``
(running a network from one layer's output), ``report`` (output files), ``cli``.
"""

from resilience.weights.fault_list import (
    FaultList,
    FaultListError,
    generate_fault_list,
    read_fault_list,
    validate_fault_list,
    write_fault_list,
)
from resilience.weights.faults import (
    FAULT_MODELS,
    WeightFault,
    WeightFaultError,
    apply_weight_faults,
    fault_targets,
    random_weight_faults,
)

__all__ = [
    "FAULT_MODELS",
    "FaultList",
    "FaultListError",
    "WeightFault",
    "WeightFaultError",
    "apply_weight_faults",
    "fault_targets",
    "generate_fault_list",
    "random_weight_faults",
    "read_fault_list",
    "validate_fault_list",
    "write_fault_list",
]
