"""SHA-256 of every file of the shipped teachers (`vlmcompress/zoo_weights/<name>/`), kept in the package: a
teacher folder is trusted only when its files hash to these (or, for a teacher retrained into the cache on another
CPU, to its own manifest written for the same recipe). After retraining a shipped teacher
(`vlmcompress zoo train NAME -o vlmcompress/zoo_weights/NAME`) copy its new manifest's hashes here;
`tests/test_teachers.py` checks that both agree."""

SHIPPED_SHA256 = {
    "shapes-clip-small": {
        "config.json": "2355ca4a80597b7a1979ca606d816c99a261ed2560d84e173ec67731c6deb50c",
        "model.safetensors": "9a3adf22ab4136e7d2adf20d2f547e931b9a74ae67afcc4cdeaf25ee57174209",
        "processor_config.json": "41d685d2adb50a023583f57c429b34d8cd957c68eeab8c72de066a406768adc5",
        "tokenizer.json": "b92c2a7e9f9e43d850f1d8b7ae1fb9bb79312bd890ea1bada5adcde1d77aecfc",
        "tokenizer_config.json": "5c4eb011f6f62b9b5f7f56c0d39844470904e8d5c4c4a3a8b95ec5b7434f7f17",
    },
    "shapes-clip": {
        "config.json": "fae8c8143bf21a02a083e5b1eac518106cd383f0120ba2c0c7e5e5e00bf3ceb5",
        "model.safetensors": "760915d8e7ac91965f9df86771492f295203e06b320811838b34669e7cfb177b",
        "processor_config.json": "d6fb01ebe8413efcbf7455087845f37279253264ae28f9e549659d7710d6376e",
        "tokenizer.json": "b92c2a7e9f9e43d850f1d8b7ae1fb9bb79312bd890ea1bada5adcde1d77aecfc",
        "tokenizer_config.json": "5c4eb011f6f62b9b5f7f56c0d39844470904e8d5c4c4a3a8b95ec5b7434f7f17",
    },
    "shapes-llava-small": {
        "chat_template.jinja": "54265a7b800b286f2fc01449829c8df85eb598c504d2446fc2415db9582941fa",
        "config.json": "b69f9a829162dda08518e1083c7013360a68bdcf70114593cdd824f95122ff4d",
        "generation_config.json": "ed56bf74196011933747081820dbbe0a59fc2828a02c186a3da276addcf9b183",
        "model.safetensors": "9ebd92eb5477111506c5f3a6218e8d3dba3dc524b06a552a86b441ce099072fd",
        "processor_config.json": "63406fb12a5970796f7afeb1f209a4d0f92c86620dfdd527f81a336852a9e821",
        "tokenizer.json": "93c33458d66c0b88cdfec2b16b5c0cccb4785edb96e522619819b66163b35224",
        "tokenizer_config.json": "2d1ed2c4c6b69e7c443cee74a347e96cc3dc839fe13e34a35192fd21a54f32a7",
    },
    "shapes-llava": {
        "chat_template.jinja": "54265a7b800b286f2fc01449829c8df85eb598c504d2446fc2415db9582941fa",
        "config.json": "238553d6745f0cae3c7476e7c2fb8d47979debbbf9979185ba42b27aa0595e6b",
        "generation_config.json": "ed56bf74196011933747081820dbbe0a59fc2828a02c186a3da276addcf9b183",
        "model.safetensors": "7f834781a811607f853c427a5b931458fb1566993274e3301c36a8ce4cdf502b",
        "processor_config.json": "9d53f1362efb0970411b7b500c3d1a52e0f85f1465b8f41d10ab87f0904debd5",
        "tokenizer.json": "93c33458d66c0b88cdfec2b16b5c0cccb4785edb96e522619819b66163b35224",
        "tokenizer_config.json": "2d1ed2c4c6b69e7c443cee74a347e96cc3dc839fe13e34a35192fd21a54f32a7",
    },
}
