from butler_zoo.recipes import Recipe, register_recipe

RECIPE = register_recipe(Recipe(
    name="llama-3.1-8b", base_model="meta-llama/Llama-3.1-8B", model_type="llama", license="llama3.1",
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rope_theta=500000.0, repo_id="butler-zoo/Llama-3.1-8B-butler", seq_len=1024, train_tokens=100_000_000,
))
