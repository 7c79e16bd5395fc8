from butler_zoo.recipes import Recipe, register_recipe

RECIPE = register_recipe(Recipe(
    name="llama-3.2-3b", base_model="meta-llama/Llama-3.2-3B", model_type="llama", license="llama3.2",
    hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
    rope_theta=500000.0, repo_id="butler-zoo/Llama-3.2-3B-butler", seq_len=1024, train_tokens=80_000_000,
))
