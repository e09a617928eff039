"""megalong: LongLoRA-style context extension of Llama models on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core warns at import that apex/TE are absent; they are optional (DESIGN.md §3).
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
# torch's deprecation notices for the ShardedTensor API that dist_checkpointing still uses.
warnings.filterwarnings("ignore", message=".*Please use DTensor instead.*")
warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*")
# TransformerConfig's default cuda_graph_scope triggers its own deprecation notice.
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
