"""The documented layout of a dsrsq results file (results/README.md), schema version 3."""

FORMAT_NAME = "dsrsq-results"
SCHEMA_VERSION = 3
# Versions this tool reads: 1 lacks process_peak_rss_bytes (named peak_rss_bytes),
# context_tokens_per_s and the order/backbone/protocol attributes; the reader fills them in.
# 1 and 2 lack the evaluation cells (/cells, the row column `cell`, /eval/<m>/cells/<k>): the reader
# makes one cell per context size of the run's single budget (see reader._implicit_cells).
READABLE_VERSIONS = (1, 2, 3)

# Root attributes every file carries (provenance attributes are optional).
ROOT_ATTRS = ("format", "schema_version", "world_size", "dp", "sp", "retention_bins")

TOP_GROUPS = ("config", "status", "train", "val", "ranks", "eval", "efficiency", "ablation", "adaptation")

TRAIN_INT = ("step", "epoch")
TRAIN_FLOAT = ("loss_total", "loss_task", "loss_retrieval", "loss_compression", "loss_compute",
               "selected_fraction", "lr", "grad_norm", "tokens_per_s", "step_time_s")
VAL_INT = ("step",)
VAL_FLOAT = ("loss",)
RANKS_INT = ("step", "rank", "bytes_sent")
RANKS_FLOAT = ("step_time_s", "comm_time_s")

EXAMPLE_STR = ("id", "task", "prediction", "gold", "meta")
EXAMPLE_FLOAT = ("f1", "em", "rouge_l", "bleu", "ttft_s", "itl_s")
EXAMPLE_INT = ("context_tokens", "attended_tokens", "kv_budget_requested_bytes", "kv_budget_achieved_bytes",
               "kv_resident_bytes", "kv_peak_prefill_bytes", "kv_read_per_step_bytes", "kv_total_bytes")

SUMMARY_FLOAT = ("f1_mean", "em_mean", "rouge_l_mean", "bleu_mean", "corpus_bleu")
SUMMARY_INT = ("n_examples",)

EFFICIENCY_INT = ("peak_mem_bytes", "avg_mem_bytes", "process_peak_rss_bytes")
EFFICIENCY_FLOAT = ("throughput_tok_s", "context_tokens_per_s", "latency_s", "itl_s", "token_efficiency", "flops")
# Files written before the columns were made per-method-honest (same schema version):
# new name -> old name; a field absent under both reads as NaN.
EFFICIENCY_OLD_NAMES = {"process_peak_rss_bytes": "peak_rss_bytes", "context_tokens_per_s": None,
                        "tokens_run": None, "context_tokens_served": None, "serve_s": None, "decode_examples": None}

# Schema 3: the efficiency numerators that let cells (and runs) merge exactly.
EFFICIENCY_MERGE_FLOAT = ("tokens_run", "context_tokens_served", "serve_s")
EFFICIENCY_MERGE_INT = ("decode_examples",)
# Schema 3: /cells (one row per cell; the attribute kv_budget holds the budget texts, space-separated).
CELLS_INT = ("context_size", "kv_budget_bytes")
CELLS_FLOAT = ("kv_budget_fraction",)
CELL_STATES = ("pending", "running", "done", "failed", "interrupted")

ADAPTATION_ARRAYS = ("age_bin_edges", "retention_by_age", "queries_per_bin")
ADAPTATION_FLOAT = ("retention_auc", "temporal_consistency", "adaptation_speed")
ADAPTATION_INT = ("n_queries",)

STATES = ("pending", "running", "done", "failed")
RUN_STATES = ("running", "done", "failed")

GOLD_SEPARATOR = "\x1f"

# Method and ablation-variant order come from the file (root attributes
# method_order and ablation_order, written from the method table); files
# without them list groups by name.

# Provenance attributes that identify the machine (compared by --compare).
HARDWARE_ATTRS = ("hostname", "cpu", "cpu_model", "device", "backend", "gpu", "gpu_name", "device_name")
