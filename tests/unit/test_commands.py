from bridge.pipeline.commands import parse


def test_commands_are_parsed_and_paths_are_not():
    assert parse("/stop").name == "stop" and parse("/stop").known
    assert parse("  /STATUS  ").name == "status"
    assert parse("/stop all").args == "all"
    unknown = parse("/frobnicate now")
    assert unknown is not None and not unknown.known and unknown.args == "now"
    assert parse("/usr/bin/ls") is None
    assert parse("echo /stop") is None
    assert parse(" / ") == parse("/help")  # a lone slash asks for the commands
