"""Intel Neural Compressor (INC) compatible FP8 static quantization: one import for the toolchain.

  config         QUANT_CONFIG parsing and validation
  scale_methods  named scale methods and the dict form of `scale_method`
  nodes          op types, INC class names, herd -> INC node names, file names
  measure        maxabs observer and measurement files (.json / .npz / _mod_list.json)
  scales         scale formulas and scale-cache files
  unify          step-3 post-processing, TP unify N -> R, EP re-split, expert coverage report
  calibrate      `herd calibrate` (the runtime side is herd.quant.methods.inc)

Flow: MEASURE (a MeasurementCollector fed by the model's hooks writes per-rank maxabs files)
-> postprocess / unify / coverage -> QUANTIZE (compute_scales, cached as `_hooks_maxabs_<METHOD>`).
"""
from herd.quant.inc.config import DEFAULT_INC_VERSION, IncQuantConfig, ModuleFilter, QuantConfigError
from herd.quant.inc.measure import MeasurementCollector, Measurements, NodeStats, backup_existing
from herd.quant.inc.scale_methods import (PRESETS, Granularity, MethodSpec, Rounding, ScaleMethod, ScaleMethodTable,
                                    TensorRule, ValueType)
from herd.quant.inc.nodes import (ATTENTION_OPS, INC_CLASSES, MULTIMODAL_PREFIX, NODE_TYPES,
                                  UNMEASURED_ATTENTION_OPS, IncNode, NodeNaming, find_measurement_sets,
                                  herd_target, inc_nodes_for_module, infer_node_class, is_selected,
                                  measurement_stem, node_weight, rank_stems, rank_suffix, scale_stem)
from herd.quant.inc.scales import (NodeScales, ScaleFile, activation_scale, compute_scales, fill_cold_experts,
                                   node_scales, round_scale, scale_file_stem, scales_for_rank,
                                   weight_scale)
from herd.quant.inc.unify import (coverage_report, expand_experts, format_coverage, load_rank_set,
                                  overlapping_ranks, postprocess, unify, unify_files, write_coverage_report)

__all__ = [
    "DEFAULT_INC_VERSION", "IncQuantConfig", "ModuleFilter", "QuantConfigError",
    "MeasurementCollector", "Measurements", "NodeStats", "backup_existing",
    "PRESETS", "Granularity", "MethodSpec", "Rounding", "ScaleMethod", "ScaleMethodTable", "TensorRule",
    "ValueType", "ATTENTION_OPS", "INC_CLASSES", "MULTIMODAL_PREFIX", "NODE_TYPES", "UNMEASURED_ATTENTION_OPS",
    "IncNode", "NodeNaming", "find_measurement_sets", "herd_target", "inc_nodes_for_module", "infer_node_class",
    "is_selected", "measurement_stem", "node_weight", "rank_stems", "rank_suffix", "scale_stem",
    "NodeScales", "ScaleFile", "activation_scale", "compute_scales", "fill_cold_experts", "node_scales", "round_scale", "scale_file_stem", "scales_for_rank",
    "weight_scale",
    "coverage_report", "expand_experts", "format_coverage", "load_rank_set", "overlapping_ranks",
    "postprocess", "unify", "unify_files", "write_coverage_report",
]
