"""The default model shipped with jetcli (model.safetensors + config.json); see jetcli.hub."""
