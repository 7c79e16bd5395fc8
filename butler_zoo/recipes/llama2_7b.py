from butler_zoo.recipes import Recipe, register_recipe

# MHA (32 KV heads): the per-KV-head selection is per head here.
RECIPE = register_recipe(Recipe(
    name="llama-2-7b", base_model="meta-llama/Llama-2-7b-hf", model_type="llama", license="llama2",
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
    rope_theta=10000.0, repo_id="butler-zoo/Llama-2-7b-hf-butler", seq_len=1024, train_tokens=100_000_000,
))
