"""Config: pydantic sections (DESIGN.md section 3), TOML + dotted CLI loading, cross-section mode rules."""

from apprentice.config.inference import InferenceConfig
from apprentice.config.load import ConfigError, dump_config, load_config, write_atomic, write_resolved
from apprentice.config.model import ModelConfig
from apprentice.config.orchestrator import (
    EndpointConfig,
    EnvConfig,
    OrchestratorConfig,
    SamplingConfig,
    TeacherEndpointConfig,
)
from apprentice.config.root import Config, LogConfig
from apprentice.config.trainer import (
    CkptConfig,
    DistillLossConfig,
    LossConfig,
    OptimConfig,
    RLLossConfig,
    SFTLossConfig,
    TrainerConfig,
)

__all__ = [
    "CkptConfig",
    "Config",
    "ConfigError",
    "DistillLossConfig",
    "EndpointConfig",
    "EnvConfig",
    "InferenceConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "OrchestratorConfig",
    "RLLossConfig",
    "SFTLossConfig",
    "SamplingConfig",
    "TeacherEndpointConfig",
    "TrainerConfig",
    "dump_config",
    "load_config",
    "write_atomic",
    "write_resolved",
]
