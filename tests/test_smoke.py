import redisengines


def test_execute_and_pull_on_two_engines(client: redisengines.Client) -> None:
    assert client.ids == [0, 1]
    assert client.execute("a = 10") == {0: None, 1: None}
    assert client.pull("a", targets=0) == 10
    assert client.pull("a") == {0: 10, 1: 10}
