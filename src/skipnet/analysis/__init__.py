"""Evaluation and analysis (SPEC §6, §8.4): per-image routing records, metrics, sweeps, figures, reports.

    routing = collect_routing(model, batches)          # one pass, every image's route in input order
    summarize(routing)                                 # accuracy, MACs, reductions, block fraction, ...
    sweep = threshold_sweep(model, batches, taus)      # accuracy / compute at every greedy threshold
    scales = input_scale_analysis(model, batches)      # executed blocks vs input size (paper Fig. 8)
    a = run_analysis(model, batches, taus=..., scales=..., sweep_images=5000)  # all three in one data pass
    write_report("reports/run1", routing, model_name="SkipNet-38", class_names=names,
                 images_for_gallery=images, sweep=sweep, scale_analysis=scales)
"""

from .metrics import (
    accuracy_by_blocks,
    block_execution_rates,
    block_fraction,
    blocks_histogram,
    gallery_indices,
    mac_reduction,
    macs_stats,
    path_strings,
    per_class_accuracy,
    per_class_block_histogram,
    per_class_mean_blocks,
    routing_paths,
    skipped_blocks,
    summarize,
    top1_accuracy,
    topk_accuracy,
)
from .plots import (
    mac_unit,
    plot_accuracy_by_blocks,
    plot_block_execution_rates,
    plot_gallery,
    plot_input_scale,
    plot_macs_histogram,
    plot_per_class,
    plot_tradeoff,
)
from .report import FIGURES, write_report
from .routing import (
    Analysis,
    Routing,
    collect_routing,
    gather_images,
    input_scale_analysis,
    rescale,
    run_analysis,
    threshold_sweep,
)

__all__ = [
    "Analysis", "Routing", "collect_routing", "threshold_sweep", "input_scale_analysis", "run_analysis",
    "gather_images", "rescale",
    "top1_accuracy", "topk_accuracy", "macs_stats", "mac_reduction", "block_fraction", "block_execution_rates",
    "blocks_histogram", "per_class_block_histogram", "per_class_mean_blocks", "per_class_accuracy",
    "accuracy_by_blocks", "path_strings", "routing_paths", "skipped_blocks", "gallery_indices", "summarize",
    "mac_unit", "plot_block_execution_rates", "plot_per_class", "plot_gallery", "plot_accuracy_by_blocks",
    "plot_macs_histogram", "plot_input_scale", "plot_tradeoff", "FIGURES", "write_report",
]
