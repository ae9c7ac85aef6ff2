"""Stand-in for ``slicer.i18n``: ``tr`` returns the text untranslated (Slicer's English locale)."""


def tr(text):
    return text


def translate(context, text):
    return text
