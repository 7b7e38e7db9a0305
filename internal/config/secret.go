package config

import (
	"fmt"
	"os"
	"strings"
)

// resolveSecret returns the secret a config value stands for: the value of
// environment variable NAME for "env:NAME", the content of PATH (without
// its trailing newline) for "file:PATH", else the value itself. Errors say
// where the secret was looked for, never what it is.
func resolveSecret(v string) (string, error) {
	switch {
	case strings.HasPrefix(v, "env:"):
		name := strings.TrimPrefix(v, "env:")
		s, ok := os.LookupEnv(name)
		if !ok || s == "" {
			return "", fmt.Errorf("environment variable %s is not set", name)
		}
		return s, nil
	case strings.HasPrefix(v, "file:"):
		path := strings.TrimPrefix(v, "file:")
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("reading %s: %v", path, err)
		}
		s := strings.TrimRight(string(b), "\r\n")
		if s == "" {
			return "", fmt.Errorf("%s is empty", path)
		}
		return s, nil
	}
	return v, nil
}

// secret resolves *v in place, reporting a problem under key.
func (p *problems) secret(key string, v *string) {
	s, err := resolveSecret(*v)
	if err != nil {
		p.add(key, "%v", err)
		return
	}
	*v = s
}
