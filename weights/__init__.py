"""The models embedded in jetcli, one folder each (model.safetensors + config.json); see jetcli.hub."""
