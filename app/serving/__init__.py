"""Request to result, without Flask: a module per endpoint and per shared piece."""
