"""Keys and devices: key generations, device key, key records, vault, enrollment, sealing."""
