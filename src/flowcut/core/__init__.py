"""Model-independent FlowCut: scoring math and the encoder-stage loop."""
