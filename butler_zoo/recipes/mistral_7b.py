from butler_zoo.recipes import Recipe, register_recipe

# Sliding window 4096: decode never selects a token outside it (the runtime reads the model's mask).
RECIPE = register_recipe(Recipe(
    name="mistral-7b-v0.1", base_model="mistralai/Mistral-7B-v0.1", model_type="mistral", license="apache-2.0",
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rope_theta=10000.0, sliding_window=4096, repo_id="butler-zoo/Mistral-7B-v0.1-butler", seq_len=1024,
    train_tokens=100_000_000,
))
