from butler_zoo.recipes import Recipe, register_recipe

RECIPE = register_recipe(Recipe(
    name="llama-3.2-1b", base_model="meta-llama/Llama-3.2-1B", model_type="llama", license="llama3.2",
    hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
    rope_theta=500000.0, repo_id="butler-zoo/Llama-3.2-1B-butler", seq_len=1024, train_tokens=80_000_000,
))
