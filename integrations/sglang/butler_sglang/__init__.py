"""SGLang plugin: the ``tokenbutler`` decode attention backend."""
