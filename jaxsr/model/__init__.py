"""What M_t is: the decoder, its config, its shardings and its Hugging Face mapping."""

from .config import ConfigError, ModelConfig, from_hf_dict, to_hf_dict
from .decoder import Decoder, KVCache, forward, init_params, param_logical_axes, param_shapes
from .sharding import MESH_AXES, ShardingError, ShardingRules, default_mesh, make_mesh
