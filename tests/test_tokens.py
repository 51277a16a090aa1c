from optical_memory.tokens import TokenCounter, default_counter


def test_default_counter_counts_cl100k_tokens():
    counter = default_counter()
    assert isinstance(counter, TokenCounter)
    assert "cl100k_base" in counter.name
    assert counter.count("") == 0
    assert counter.count("hello world") == 2
    longer = counter.count("hello world " * 50)
    assert 90 <= longer <= 110


def test_special_token_text_is_counted_as_plain_text():
    # Transcript text may contain "<|endoftext|>"; it must be counted, never rejected.
    assert default_counter().count("a <|endoftext|> b") > 3


def test_default_counter_is_shared():
    assert default_counter() is default_counter()
