"""The entry-point module: registers the vLLM generation backend and serving engine by dotted
path, so that vLLM is imported only when a command chooses one."""

from tunesmith import GenerationBackendSpec, ServingEngineSpec, hookimpl


@hookimpl
def tunesmith_register_generation_backends():
    return [
        GenerationBackendSpec(
            name="vllm",
            backend="tunesmith_vllm.rollouts:VLLMBackend",
            description="a vLLM engine in the training process, loaded with the policy's weights after each update",
            devices=("cuda", "cpu"),
        )
    ]


@hookimpl
def tunesmith_register_serving_engines():
    return [
        ServingEngineSpec(
            name="vllm",
            engine="tunesmith_vllm.serving:VLLMEngine",
            description="a vLLM engine: requests batched continuously over a paged KV cache, LoRA adapters per request",
            devices=("cuda", "cpu"),
        )
    ]
