"""The results site: ``repro report`` turns a results folder into static HTML pages (index, one page per suite, and
a compare page of two folders) whose every verdict is ``repro check``'s."""
