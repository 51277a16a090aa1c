"""Where agent frameworks already are: each module adapts `OpticalMemory` to one framework's
own interface and is installed with that framework as an extra (`pip install
"optical-memory[langchain]"`, `[langgraph]`, `[llamaindex]`, `[mcp]`). The core imports none
of them."""
