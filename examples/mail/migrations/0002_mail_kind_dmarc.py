from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("mail", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="mail",
            name="kind",
            field=models.CharField(default="normal", max_length=20),
        ),
        migrations.AddField(
            model_name="mail",
            name="dmarc",
            field=models.CharField(blank=True, max_length=20),
        ),
    ]
