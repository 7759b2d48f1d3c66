"""The one error type for bad input: it always names the sample it came from."""


class SampleError(ValueError):
    """A sample (image, video, conversation) that cannot be processed as given."""

    def __init__(self, sample: str | None, problem: str):
        self.sample = sample
        self.problem = problem
        where = f"sample {sample!r}" if sample is not None else "input"
        super().__init__(f"{where}: {problem}")
