"""moeserve: a lean engine that serves DeepSeek-style Mixture-of-Experts models."""

from moeserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # The engine pulls in the model code; import it only when LLM is asked for.
    if name == "LLM":
        from moeserve.engine.llm import LLM
        return LLM
    raise AttributeError(name)
