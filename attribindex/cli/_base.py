"""What every command shares: the command classes that turn a library error into one clean line naming the
command's own flags."""

from __future__ import annotations

import re

import click

from attribindex.errors import AttribIndexError

_CODE_SPAN = re.compile(r"`([^`]+)`")
QUOTES = "'\""  # around a string value in a library message: `text_field='body'`


def in_flags(message: str, command: click.Command) -> str:
    """A library message as this command's user should read it: each code span that names parameters of the
    command (`overwrite=True`, `num_shards=3, shard_index=1`, `text_field`) names its flags instead
    (--overwrite, --num-shards 3 --shard-index 1, --text-field). Other spans stay as they are.

    Example:
        >>> from attribindex.cli._build import build
        >>> in_flags("Pass `overwrite=True` to replace it.", build)
        'Pass --overwrite to replace it.'
    """
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}

    def as_flags(span: re.Match) -> str:
        flags = []
        for part in re.split(r",\s*", span.group(1)):
            name, _, value = part.partition("=")
            option = options.get(name.strip())
            if option is None:
                return span.group(0)
            flag = max(option.opts, key=len)
            flags.append(flag if option.is_flag or not value else f"{flag} {value.strip(QUOTES)}")
        return " ".join(flags)

    return _CODE_SPAN.sub(as_flags, message)


class Command(click.Command):
    """Turns AttribIndexError into one clean error line (exit code 1) instead of a traceback, naming this
    command's flags where the library names parameters."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AttribIndexError as err:
            from attribindex._progress import close_open_bars

            close_open_bars()  # a bar left open by the failure would share the error's line
            raise click.ClickException(in_flags(str(err), self)) from None


class Group(click.Group):
    """A group whose commands are `Command`s, and whose subgroups are `Group`s (so their commands are too)."""

    command_class = Command
    group_class = type
