"""The Performer protein LM as a plain ``nn.Module`` (training concerns live in ``proteinperformer.training.lm``)."""

from proteinperformer.model.performer import Block, ModelConfig, PerformerLM, convert_attention, is_feature_key

__all__ = ["Block", "ModelConfig", "PerformerLM", "convert_attention", "is_feature_key"]
