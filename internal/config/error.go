package config

import (
	"fmt"
	"strings"
)

// Error is every configuration problem: bad YAML, an unknown key, a value out
// of range. Commands exit with status 2 on it, so a user can tell a mistake in
// their configuration from a failure at run time.
type Error struct {
	Key  string // offending key, e.g. "timeout" or "whitelist[0].url"; "" for the file as a whole
	Line int    // line of Key in File; 0 when unknown, e.g. for a value set by a flag
	Msg  string // what is wrong, without the key or line
	File string // config file the line refers to; "" when unknown

	err error // cause, for errors.Is (e.g. fs.ErrNotExist)
}

// Error formats as `config: FILE: line N: KEY: MSG`, leaving out the parts
// that are unknown.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("config: ")
	if e.File != "" {
		b.WriteString(e.File)
		b.WriteString(": ")
	}
	if e.Line > 0 {
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Key != "" {
		b.WriteString(e.Key)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Unwrap returns the cause, if any, such as the error reading the file.
func (e *Error) Unwrap() error { return e.err }
