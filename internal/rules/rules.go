// Package rules decides whether a relayed request may pass, using root-gg/wsp's
// whitelist and blacklist rules: unanchored regular expressions on the method,
// the URL and header values. It does no I/O and holds no state beyond the
// compiled expressions, so one Set may be shared by any number of goroutines.
package rules

import (
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"regexp/syntax"
	"slices"
)

// Spec is one rule as written in a config file (root-gg/wsp syntax).
// Every field is an unanchored regular expression (RE2 syntax); an empty field
// matches anything, so the empty Spec matches every request.
type Spec struct {
	// Method is matched against the request method, e.g. "^(GET|HEAD)$".
	Method string `yaml:"method" json:"method,omitempty"`
	// URL is matched against the destination URL, or "host:port" for CONNECT.
	URL string `yaml:"url" json:"url,omitempty"`
	// Headers maps a header name to an expression matched against that
	// header's first value; an absent header is matched as "".
	Headers map[string]string `yaml:"headers" json:"headers,omitempty"`
}

// Rule is a compiled Spec. The zero Rule matches every request.
type Rule struct {
	method  *regexp.Regexp // nil matches any method
	url     *regexp.Regexp // nil matches any URL
	headers []headerRule   // sorted by name so matching cost does not vary with map order
}

type headerRule struct {
	name string // canonical form, as http.Header stores it
	re   *regexp.Regexp
}

// FieldError is a problem with one field of a rule. Field is "url", "method"
// or "headers.NAME" from Compile, prefixed with the list and index
// ("whitelist[1].url") from NewSet, so configuration errors can name the key.
type FieldError struct {
	Field string
	Err   error
}

// Error returns "FIELD: problem".
func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }

// Unwrap returns the underlying problem.
func (e *FieldError) Unwrap() error { return e.Err }

// Compile checks and compiles s. Errors are *FieldError naming the field, e.g.
// `url: invalid regular expression "(": missing closing )`.
func Compile(s Spec) (Rule, error) {
	var r Rule
	var err error
	if r.method, err = compile("method", s.Method); err != nil {
		return Rule{}, err
	}
	if r.url, err = compile("url", s.URL); err != nil {
		return Rule{}, err
	}
	names := make([]string, 0, len(s.Headers))
	for name := range s.Headers {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		field := "headers." + name
		if !validHeaderName(name) {
			// A name that is not an HTTP token can never appear in a request,
			// so the rule would silently compare against "" forever.
			return Rule{}, &FieldError{Field: field, Err: fmt.Errorf("invalid header name %q", name)}
		}
		re, err := compile(field, s.Headers[name])
		if err != nil {
			return Rule{}, err
		}
		if re == nil {
			continue
		}
		r.headers = append(r.headers, headerRule{name: http.CanonicalHeaderKey(name), re: re})
	}
	return r, nil
}

// compile returns nil for an empty expression: it would match anything, and a
// nil check is cheaper than running a regexp on every request.
func compile(field, expr string) (*regexp.Regexp, error) {
	if expr == "" {
		return nil, nil
	}
	re, err := regexp.Compile(expr)
	if err != nil {
		msg := err.Error()
		if se, ok := err.(*syntax.Error); ok {
			msg = string(se.Code)
		}
		return nil, &FieldError{Field: field, Err: fmt.Errorf("invalid regular expression %q: %s", expr, msg)}
	}
	return re, nil
}

// validHeaderName reports whether name is an RFC 9110 token.
func validHeaderName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c < 0x80 && isTokenSymbol[c]:
		default:
			return false
		}
	}
	return true
}

var isTokenSymbol = [128]bool{
	'!': true, '#': true, '$': true, '%': true, '&': true, '\'': true, '*': true,
	'+': true, '-': true, '.': true, '^': true, '_': true, '`': true, '|': true, '~': true,
}

// Match reports whether a request matches r: every non-empty field of the
// Spec must match. h may be nil.
func (r Rule) Match(method, url string, h http.Header) bool {
	if r.method != nil && !r.method.MatchString(method) {
		return false
	}
	if r.url != nil && !r.url.MatchString(url) {
		return false
	}
	for _, hr := range r.headers {
		if !hr.re.MatchString(h.Get(hr.name)) {
			return false
		}
	}
	return true
}

// Set is a compiled whitelist and blacklist. A nil *Set allows everything.
type Set struct {
	whitelist []Rule
	blacklist []Rule
}

// NewSet compiles both lists. Errors are *FieldError naming the rule and the
// field, e.g. "whitelist[1].url: invalid regular expression ...".
func NewSet(whitelist, blacklist []Spec) (*Set, error) {
	w, err := compileList("whitelist", whitelist)
	if err != nil {
		return nil, err
	}
	b, err := compileList("blacklist", blacklist)
	if err != nil {
		return nil, err
	}
	return &Set{whitelist: w, blacklist: b}, nil
}

func compileList(list string, specs []Spec) ([]Rule, error) {
	rules := make([]Rule, 0, len(specs))
	for i, s := range specs {
		r, err := Compile(s)
		if err != nil {
			field, cause := "", err
			if fe, ok := errors.AsType[*FieldError](err); ok {
				field, cause = "."+fe.Field, fe.Err
			}
			return nil, &FieldError{Field: fmt.Sprintf("%s[%d]%s", list, i, field), Err: cause}
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// Check returns nil when the request is allowed, else a *Refusal. A request
// is refused if it matches any blacklist rule, and, when a whitelist is set,
// unless it matches one whitelist rule. The blacklist wins over the whitelist.
func (s *Set) Check(method, url string, h http.Header) error {
	if s == nil {
		return nil
	}
	for i, r := range s.blacklist {
		if r.Match(method, url, h) {
			return &Refusal{Reason: fmt.Sprintf("matches blacklist rule %d", i+1)}
		}
	}
	if len(s.whitelist) == 0 {
		return nil
	}
	for _, r := range s.whitelist {
		if r.Match(method, url, h) {
			return nil
		}
	}
	return &Refusal{Reason: "matches no whitelist rule"}
}

// HasWhitelist reports whether a whitelist is set, i.e. whether the Set
// refuses requests that no rule mentions.
func (s *Set) HasWhitelist() bool {
	return s != nil && len(s.whitelist) > 0
}

// Refusal is why Check refused a request. Rules are numbered from 1 in the
// order of the config file, because the reason is read by people.
type Refusal struct {
	Reason string // e.g. "matches blacklist rule 2", "matches no whitelist rule"
}

// Error returns the reason alone; callers say what was refused and by whom.
func (r *Refusal) Error() string { return r.Reason }
